"""Dataset file formats, each turned into :class:`~mmbridge.data.formats.llava.Sample` lists."""

from mmbridge.data.formats.llava import Sample, load_llava_json

__all__ = ["Sample", "load_llava_json"]
