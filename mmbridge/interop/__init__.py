"""Import/export with transformers model classes (LLaVA: :func:`from_hf_llava`, :func:`to_hf_llava`)."""

from mmbridge.interop.llava import from_hf_llava, to_hf_llava

__all__ = ["from_hf_llava", "to_hf_llava"]
