"""SmolVLM / SmolVLM2 and Idefics3: the image is resized to a longest edge, split into tiles plus a global view,
each tile a block of <image> tokens after pixel shuffle, marked by <fake_token_around_image> and its
<row_r_col_c> / <global-img> name; a Llama-style text model with plain 1D RoPE. The processor also returns a
pixel attention mask (padding of tiles), which the prefill passes on as generate() does. SmolVLM's processor
needs `num2words` (the `smolvlm` extra). SmolVLM2 takes video (frames sampled by its video processor, each a
global image after a timestamp); Idefics3's processor has no video processor, so it takes none."""

from __future__ import annotations

from .plain import PlainImageText


class SmolVLM(PlainImageText):
    name = "smolvlm"
    model_types = ("smolvlm", "idefics3")

    @property
    def takes_video(self) -> bool:
        return getattr(self.processor, "video_processor", None) is not None
