"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``.

Under Flower's default ``subprocess`` isolation the SuperNode starts a fresh ``flwr-clientapp``
process for every message: it imports Flower, JAX and fedjax_med, loads the site's images and
compiles the local update again, seconds of start-up per message that dominate a small round.
With ``--isolation process`` the SuperNode instead waits for an outside executor to take each
message's task from its Runtime API (``AcquireTask``, as Flower's ``flower-superexec`` does).
:func:`serve` is that executor, in one process that lives as long as the SuperNode: it takes
each task, runs the ClientApp on it *in this process* (Flower's own task I/O: pull the message
and ``Context``, push the reply and the updated ``Context``), and keeps the loaded site and the
compiled functions (:func:`fedjax_med.deploy.flower_app.site_of`,
:func:`fedjax_med.deploy.site._compiled`) between messages, so each program compiles once per
hospital.

The hospital runs the ClientApp installed on its own machine (``--app``, by default
``fedjax_med.deploy.flower_app:client_app``), never code that arrives with a run: the app
bundle the server submits only names the run.

This module reads Flower's Runtime API client and task I/O functions (Flower 1.42).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

import httpx
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as task_io

from fedjax_med.deploy import flower

logger = logging.getLogger("fedjax_med")

DEFAULT_APP = "fedjax_med.deploy.flower_app:client_app"


def load_app(ref: str) -> Any:
    """The ClientApp named by ``"module:attribute"``.

    Raises:
      ValueError: if ``ref`` is not of that form.
    """
    module, sep, attribute = ref.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"--app {ref!r} must be MODULE:ATTRIBUTE, e.g. {DEFAULT_APP}")
    return getattr(importlib.import_module(module), attribute)


def _client(address: str, *interceptors, retry: bool = True) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=make_simple_http_retry_invoker() if retry else None,
    )


def run_task(address: str, token: str, app: Any) -> bool:
    """Runs ``app`` on the task of ``token`` in this process; returns whether it completed.

    An exception in the app becomes Flower's error reply (``CLIENT_APP_RAISED_EXCEPTION``), as
    in a ``flwr-clientapp`` process; the ``Context`` (the site's ledger) is pushed back only when
    the app completed.
    """
    client = _client(
        address,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "the ClientApp did not run"
    try:
        message, context, _, _ = task_io.pull_task_input(client)
        try:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as e:  # noqa: BLE001 - reported to the server as Flower does
            logger.exception("the ClientApp raised on a %s message", message.metadata.message_type)
            details = f"{type(e)}:<'{e}'>"
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
            reply = Message(error, reply_to=message)
        task_io.push_message(client, reply, context)
    finally:
        task_io.push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def serve(address: str, app: Any, stop: threading.Event, *, poll: float = 0.1) -> int:
    """Takes and runs the SuperNode's ClientApp tasks until ``stop`` is set; returns how many.

    Args:
      address: the SuperNode's Runtime API (``127.0.0.1:PORT``, its ``--port``).
      app: the ClientApp (:func:`load_app`).
      stop: set to end the loop (the SuperNode exited or was refused).
      poll: seconds between two ``AcquireTask`` calls while there is no task.
    """
    flower.quick_object_pulls(task_io.__name__, "pull_and_inflate_object_from_tree")
    # No retries inside a call: the loop itself retries, and checks ``stop`` in between.
    version = RuntimeVersionHttpInterceptor(component_name="SuperExec")
    client = _client(address, version, retry=False)
    client_app_tasks = [str(TaskType.CLIENT_APP)]
    done = 0
    try:
        while not stop.is_set():
            try:
                response = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=client_app_tasks)
                )
            except httpx.HTTPError:  # the SuperNode's Runtime API is not up (yet)
                stop.wait(0.5)
                continue
            if response.HasField("task") and response.token:
                tic = time.perf_counter()
                try:
                    completed = run_task(address, response.token, app)
                except httpx.HTTPError as e:  # the SuperNode went away mid-task
                    logger.warning("ClientApp task lost its SuperNode: %s", e)
                    completed = False
                done += 1
                logger.info(
                    "ClientApp task %d %s in %.2f s",
                    done,
                    "done" if completed else "failed",
                    time.perf_counter() - tic,
                )
            else:
                stop.wait(poll)
    finally:
        client.close()
    return done
