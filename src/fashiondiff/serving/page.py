"""The web page (Gradio): text -> image and photo + text -> image, base and tuned side by side.

Usage::

    page = build(studio, queue_size=8)      # a gr.Blocks with its bounded queue
    page.launch(**launch_options(host="127.0.0.1", port=7860, max_upload_mb=10))

Safety: one generation at a time for both tabs (one concurrency group, limit 1), at most
``queue_size`` waiting (more are told the queue is full), uploads over the cap refused by
the server before they reach the code, and every error a message on the page (gr.Error),
never a dead server. A photo + text result shows the photo beside the two models' edits
(``image-source``, hidden after a text -> image result); the API's ``/photo_to_image`` and
``/text_to_image`` return (base, tuned, notes). Element ids
(``text-prompt``, ``text-go``, ``photo``, ``photo-prompt``, ``photo-go``, ``image-source``,
``image-base``, ``image-tuned``) are what the browser tests drive.
"""

from __future__ import annotations

import logging

import gradio as gr
from PIL import UnidentifiedImageError

from fashiondiff.errors import PipelineError
from fashiondiff.serving.images import PHOTO_FORMATS
from fashiondiff.serving.studio import NO_ADAPTER, Studio

TITLE = "fashiondiff: Kandinsky 2.1 fine-tuned on FashionGen"
GROUP = "generate"  # the one concurrency group both tabs share
# System fonts: the default theme would fetch Google Fonts, which a machine offline cannot.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
LOG = logging.getLogger("fashiondiff.serve")
IMAGE_HEIGHT = 320  # shown size: small models draw 64 px, shown scaled up with crisp pixels
CSS = (
    "#image-source img, #image-base img, #image-tuned img, #photo img "
    "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
)


class PhotoInput(gr.Image):
    """gr.Image whose unreadable uploads become a message instead of PIL's error text
    (which names the server's temporary file). Same front end as gr.Image. (Gradio writes
    page.pyi, a typing stub, beside this file for any component subclass: git ignores it.)"""

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError):
            raise gr.Error(f"that upload is not an image ({PHOTO_FORMATS} work)") from None


def build(studio: Studio, queue_size: int) -> gr.Blocks:
    s, limits = studio.sampling, studio.limits
    with gr.Blocks(title="fashiondiff", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## {TITLE}\n{studio.describe()}. {s.height}x{s.width} px; one generation at a time.")
        with gr.Tabs():
            with gr.Tab("Describe a garment"):
                text_prompt = gr.Textbox(label="Prompt", placeholder="black leather mini skirt", elem_id="text-prompt")
                text_go = gr.Button("Generate", variant="primary", elem_id="text-go")
            with gr.Tab("Photo + what to change"):
                with gr.Row():
                    photo = PhotoInput(
                        label="Photo",
                        type="filepath",
                        image_mode=None,
                        height=IMAGE_HEIGHT,
                        sources=["upload", "clipboard"],
                        elem_id="photo",
                    )
                    with gr.Column():
                        photo_prompt = gr.Textbox(label="Prompt", placeholder="red silk blouse", elem_id="photo-prompt")
                        strength = gr.Slider(
                            0.05, 1.0, value=s.strength, step=0.05, label="Strength: how far from the photo"
                        )
                        photo_go = gr.Button("Generate", variant="primary", elem_id="photo-go")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            steps = gr.Slider(1, limits.max_steps, value=s.steps, step=1, label="Steps")
            guidance = gr.Slider(1.0, limits.max_guidance, value=s.guidance_scale, step=0.5, label="Guidance")
            adapter = gr.Dropdown(
                [NO_ADAPTER, *studio.adapters],
                value=NO_ADAPTER,
                visible=bool(studio.adapters),
                label="LoRA adapter on the base model",
            )
        with gr.Row():
            source = gr.Image(
                label="your photo",
                format="png",
                interactive=False,
                height=IMAGE_HEIGHT,
                visible=False,
                elem_id="image-source",
            )
            images = [
                gr.Image(
                    label=side.label,
                    format="png",
                    interactive=False,
                    height=IMAGE_HEIGHT,
                    buttons=["download", "fullscreen"],
                    elem_id=f"image-{side.label}",
                )
                for side in studio.sides
            ]
        notes = gr.Markdown(elem_id="notes")
        outputs = [*images, notes]
        events = dict(outputs=outputs, concurrency_limit=1, concurrency_id=GROUP)

        def on_text(prompt, seed, steps, guidance, adapter):
            return _generate(studio, prompt, None, seed, steps, guidance, s.strength, adapter)

        def on_photo(photo, prompt, seed, steps, guidance, strength, adapter):
            if not photo:
                raise gr.Error("upload a photo first (or use the Describe tab)")
            return _generate(studio, prompt, photo, seed, steps, guidance, strength, adapter)

        def show_source(photo, strength):
            return gr.Image(value=photo, visible=True, label=f"your photo (strength {float(strength):g})")

        def hide_source():
            return gr.Image(value=None, visible=False)

        settings = [seed, steps, guidance]
        text_go.click(on_text, [text_prompt, *settings, adapter], api_name="text_to_image", **events).success(
            hide_source, None, source, api_visibility="private", queue=False
        )
        text_prompt.submit(on_text, [text_prompt, *settings, adapter], api_visibility="private", **events).success(
            hide_source, None, source, api_visibility="private", queue=False
        )
        photo_go.click(
            on_photo, [photo, photo_prompt, *settings, strength, adapter], api_name="photo_to_image", **events
        ).success(show_source, [photo, strength], source, api_visibility="private", queue=False)
    return page.queue(max_size=queue_size, default_concurrency_limit=1)


def launch_options(host: str, port: int, max_upload_mb: float) -> dict:
    """``gr.Blocks.launch`` keywords: the address, the upload cap, the offline theme."""
    return dict(
        server_name=host,
        server_port=port,
        max_file_size=int(max_upload_mb * 2**20),
        show_error=False,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
        share=False,
        inbrowser=False,
    )


def _generate(studio: Studio, prompt, photo, seed, steps, guidance, strength, adapter):
    try:
        result = studio.generate(prompt, photo, seed, steps, guidance, strength, adapter or NO_ADAPTER)
    except PipelineError as exc:
        raise gr.Error(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a bug must not take the page down; the log keeps it
        LOG.exception("generation failed")
        raise gr.Error(f"generation failed ({type(exc).__name__}); the server log has the details") from None
    for note in result.notes:
        gr.Warning(note)
    updates = [gr.update(value=result.images[side.label], label=result.labels[side.label]) for side in studio.sides]
    return [*updates, "\n".join(f"- {note}" for note in result.notes)]
