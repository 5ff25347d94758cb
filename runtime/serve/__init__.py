"""edgekiln's HTTP server: the Open Inference Protocol v2 plus an image endpoint.

    edgekiln serve runs/demo/bundle --port 8000 --max-batch 32 --max-delay-ms 5

The KServe / Triton "v2" REST protocol, so tritonclient and KServe clients work
unchanged (https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol);
the endpoints are listed in runtime.serve.app. Concurrent requests are merged by a
DynamicBatcher into one model call of up to `max_batch` images, waiting at most
`max_delay_ms` after the first one arrived; the model runs in one worker thread so
the event loop stays free. Errors are JSON `{"error": "..."}`. Nothing here imports torch.

settings    ServeSettings (validated once) and the workers' environment hand-off
protocol    the v2 request/response models, the binary tensor extension, ApiError
batcher     DynamicBatcher
metrics     Prometheus metrics
middleware  the body limit and the request metrics
app         handlers over the model handle in app.state, create_app
launch      serve, app_from_env
"""

from runtime.serve.app import create_app
from runtime.serve.batcher import DynamicBatcher
from runtime.serve.launch import app_from_env, serve
from runtime.serve.protocol import ApiError
from runtime.serve.settings import SETTINGS_ENV, ServeSettings

__all__ = ["ApiError", "DynamicBatcher", "SETTINGS_ENV", "ServeSettings", "app_from_env", "create_app", "serve"]
