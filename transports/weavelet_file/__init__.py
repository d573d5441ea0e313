"""``file://DIR``: weavelet's zero-server transport, one directory shared by the processes of a host."""

from weavelet_file.transport import FileTransport

__all__ = ["FileTransport"]
