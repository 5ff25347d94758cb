"""Starting the server: `serve` (what `edgekiln serve` calls) and the uvicorn worker factory."""

from __future__ import annotations

import logging

from runtime.serve.app import create_app, load_classifier, wants_self_test
from runtime.serve.settings import ServeSettings, settings_from_env, settings_to_env


def app_from_env():
    """uvicorn factory for `--workers N`: settings come from $EDGEKILN_SERVE_SETTINGS (JSON)."""
    if not logging.getLogger().handlers:  # a fresh worker process: log like the parent CLI does
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return create_app(settings_from_env())


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = False, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish first.

    With one worker the model is loaded here first, so a bad bundle or an
    unavailable backend fails before uvicorn starts (a one-line CLI error);
    with several, each worker process loads its own copy.
    """
    import uvicorn

    import runtime

    common = dict(host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on",
                  timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    if workers == 1:
        clf = load_classifier(settings)
        if wants_self_test(settings, clf):
            clf.self_test()  # here rather than in the lifespan: a failure is a one-line CLI error
            settings = settings.model_copy(update={"self_test": False})
        uvicorn.run(create_app(settings, classifier=clf), **common)
    else:
        runtime.read_bundle(settings.bundle_dir, verify=True)  # fail fast on a bad bundle
        settings_to_env(settings)
        uvicorn.run("runtime.serve.launch:app_from_env", factory=True, workers=workers, **common)
