"""The terminal dashboard of ``weavelet top`` (needs Textual: ``pip install "weavelet[tui]"``)."""
