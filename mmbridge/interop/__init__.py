"""Import/export with transformers model classes.

LLaVA: :func:`from_hf_llava`, :func:`to_hf_llava`; LLaVA-NeXT (AnyRes): :func:`from_hf_llava_next`,
:func:`to_hf_llava_next`; BLIP-2: :func:`from_hf_blip2`, :func:`to_hf_blip2`;
InstructBLIP: :func:`from_hf_instructblip`, :func:`to_hf_instructblip`; IDEFICS (Flamingo):
:func:`from_hf_idefics`, :func:`to_hf_idefics`; Fuyu (OtterHD, native resolution): :func:`from_hf_fuyu`,
:func:`to_hf_fuyu`. :func:`export_hf` writes any of them as a complete transformers directory (weights, config,
tokenizer, processor files), as ``mmbridge export --format hf`` does.

transformers' own input layouts become the model's keyword arguments through :func:`blip2_inputs`,
:func:`llava_next_inputs`, :func:`idefics_inputs` and :func:`fuyu_inputs` (LLaVA's tensors are already the
model's).
"""

from mmbridge.interop.blip2 import (blip2_inputs, from_hf_blip2, from_hf_instructblip, to_hf_blip2,
                                    to_hf_instructblip)
from mmbridge.interop.export import export_hf
from mmbridge.interop.fuyu import from_hf_fuyu, fuyu_inputs, to_hf_fuyu
from mmbridge.interop.idefics import from_hf_idefics, idefics_inputs, to_hf_idefics
from mmbridge.interop.llava import from_hf_llava, to_hf_llava
from mmbridge.interop.llava_next import from_hf_llava_next, llava_next_inputs, to_hf_llava_next

__all__ = ["from_hf_llava", "to_hf_llava", "from_hf_llava_next", "to_hf_llava_next", "llava_next_inputs",
           "from_hf_blip2", "to_hf_blip2", "from_hf_instructblip", "to_hf_instructblip", "blip2_inputs",
           "from_hf_idefics", "to_hf_idefics", "idefics_inputs", "from_hf_fuyu", "to_hf_fuyu", "fuyu_inputs",
           "export_hf"]
