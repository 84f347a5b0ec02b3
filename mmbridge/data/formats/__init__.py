"""Dataset file formats, each turned into :class:`~mmbridge.data.formats.llava.Sample` lists."""

from mmbridge.data.formats.interleaved import is_document, load_interleaved
from mmbridge.data.formats.llava import Sample, load_llava_json, read_records

__all__ = ["Sample", "is_document", "load_interleaved", "load_llava_json", "read_records"]
