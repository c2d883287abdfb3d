"""Faust's livelock diagnostics are warnings in the spend worker's log, not errors.

Probe K (session 18) froze the worker with SIGSTOP: after every freeze it logged ERROR lines
("Stream has not started processing TP(...)", "Aiokafka has not sent fetch request ...",
"Thread keepalive is not responding...") although it had counted every event exactly once
afterwards: 50 ERROR lines in a session, the only ERRORs of the whole stack, each one a
page for whoever alerts on ERROR. The worker has its own stall watch, which fetches such
partitions again and says so. The texts come from Faust itself, so this fails if Faust
changes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from agents.spend import demote_faust_livelock_logs

LIVELOCK_TEXTS = [
    faust_aiokafka.SLOW_PROCESSING_STREAM_IDLE_SINCE_START,
    faust_aiokafka.SLOW_PROCESSING_STREAM_IDLE,
    faust_aiokafka.SLOW_PROCESSING_NO_FETCH_SINCE_START,
    faust_aiokafka.SLOW_PROCESSING_NO_RECENT_FETCH,
    faust_aiokafka.SLOW_PROCESSING_NO_RESPONSE_SINCE_START,
    faust_aiokafka.SLOW_PROCESSING_NO_RECENT_RESPONSE,
    faust_aiokafka.SLOW_PROCESSING_NO_HIGHWATER_SINCE_START,
    faust_aiokafka.SLOW_PROCESSING_NO_COMMIT_SINCE_START,
    faust_aiokafka.SLOW_PROCESSING_NO_RECENT_COMMIT,
    "Thread keepalive is not responding...",  # mode.threads.ServiceThread._keepalive2
]


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def faust_log() -> Iterator[Capture]:
    logger = logging.getLogger(faust_aiokafka.__name__)
    capture = Capture()
    logger.addHandler(capture)
    demote_faust_livelock_logs()
    demote_faust_livelock_logs()  # idempotent: one filter
    yield capture
    logger.removeHandler(capture)


@pytest.mark.parametrize("text", LIVELOCK_TEXTS)
def test_faust_livelock_diagnostics_are_logged_as_warnings(faust_log: Capture, text: str) -> None:
    # As mode's CompositeLogger passes them: the service's beacon before Faust's text.
    message = "[^---AIOKafkaConsumerThread]: " + text
    args = ("TP(topic='tollgate.usage', partition=4)", "9.80 minutes ago")[: text.count("%")]
    logging.getLogger(faust_aiokafka.__name__).error(message, *args)
    [record] = faust_log.records
    assert (record.levelno, record.levelname) == (logging.WARNING, "WARNING")
    assert "stall watch" in record.getMessage()


def test_other_faust_errors_stay_errors(faust_log: Capture) -> None:
    logging.getLogger(faust_aiokafka.__name__).error("Consumer error: %r", "broken")
    [record] = faust_log.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "Consumer error: 'broken'"
