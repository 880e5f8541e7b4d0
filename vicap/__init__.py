"""vicap: ClipCap-style image captioning for low-resource languages.

A frozen CLIP image encoder, a small trained mapper, and a pretrained causal LM of the target language.
"""

from vicap._compat import guard_torchvision

# Once, before anything below (or a user) imports open_clip, peft or transformers' vision parts.
guard_torchvision()

__version__ = "0.1.0"
