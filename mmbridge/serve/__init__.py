"""OpenAI-compatible serving of a saved model: ``mmbridge serve --model DIR`` (see :mod:`mmbridge.serve.app`).

fastapi and uvicorn (the ``serve`` extra) are imported only when an app is built or served.
"""

from __future__ import annotations

from typing import Any

from mmbridge.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def create_app(model: Any, settings: ServeSettings, answer_images: Any = None) -> Any:
    """The FastAPI app serving ``model``; ``answer_images`` draws the images of models that answer with them
    (see :func:`mmbridge.serve.app.create_app`)."""
    from mmbridge.serve.app import create_app as build

    return build(model, settings, answer_images)


def serve(model_dir: str, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu") -> None:
    """Load ``model_dir`` and serve it (see :func:`mmbridge.serve.server.serve`)."""
    from mmbridge.serve.server import serve as run

    run(model_dir, settings, host=host, port=port, device=device)
