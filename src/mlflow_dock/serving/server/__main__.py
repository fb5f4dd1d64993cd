"""`python -m mlflow_dock_serving`: the serving image's command.

Binds $PORT (else $MLFLOW_DOCK_SERVING_PORT, else 8080) on all interfaces, with no access log,
as the image's former `uvicorn ... mlflow.pyfunc.scoring_server.app:app` did; no shell is needed
to read the port.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    from .config import ConfigError, ServerConfig

    try:
        config = ServerConfig.from_environ(os.environ)
    except ConfigError as exc:
        print(f"mlflow-dock serving: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(config=config), host=config.host, port=config.port, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
