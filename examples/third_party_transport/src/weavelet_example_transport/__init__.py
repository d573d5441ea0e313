"""An example third-party weavelet transport: ``example:///DIR`` stores runs like ``file:///DIR``."""
