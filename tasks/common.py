from __future__ import annotations

import logging


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, the module logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lung_factory")


def say(message: str) -> None:
    """Progress lines: to the Prefect run log (which the UI shows) and to the console."""
    run_logger().info(message)
