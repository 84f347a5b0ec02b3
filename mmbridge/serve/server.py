"""Run the server: load a saved model, cap PIL's decoder, serve the app with uvicorn."""

from __future__ import annotations

import logging
import os

from PIL import Image

from mmbridge.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def default_model_name(model_dir: str) -> str:
    """The name a model is served under without ``--served-model-name``: its directory's name."""
    return os.path.basename(os.path.normpath(os.path.abspath(model_dir)))


def serve(model_dir: str, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu") -> None:
    """Load ``model_dir`` and serve it until interrupted."""
    import uvicorn

    from mmbridge.model.multimodal import MultimodalModel
    from mmbridge.serve.app import create_app
    from mmbridge.serve.outputs import drawing_hook

    settings.validate()
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # PIL refuses (bomb error) at twice this, as a backstop
    model = MultimodalModel.from_pretrained(model_dir).to(device).eval()
    app = create_app(model, settings, answer_images=drawing_hook(model))
    logger.info("serving %s as %r on http://%s:%d/v1", model_dir, settings.served_model_name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
