"""vicap: ClipCap-style image captioning for low-resource languages.

A frozen CLIP image encoder, a small trained mapper, and a pretrained causal LM of the target language.
"""

from vicap._compat import install_torchvision_guard

# Before anything below (or a user) imports open_clip, peft or transformers' vision parts; without
# importing torch yet, so that vicap.runtime can still set torch's OpenMP environment.
install_torchvision_guard()

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from vicap import Captioner` without importing torch (and the models' libraries) with vicap
    # itself: vicap.runtime must set torch's OpenMP environment before torch loads.
    if name == "Captioner":
        from vicap.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'vicap' has no attribute {name!r}")
