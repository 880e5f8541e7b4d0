"""vicap: ClipCap-style image captioning for low-resource languages.

A frozen CLIP image encoder, a small trained mapper, and a pretrained causal LM of the target language.
"""

from vicap._compat import install_torchvision_guard

# Before anything below (or a user) imports open_clip, peft or transformers' vision parts; without
# importing torch yet, so that vicap.runtime can still set torch's OpenMP environment.
install_torchvision_guard()

__version__ = "0.1.0"
