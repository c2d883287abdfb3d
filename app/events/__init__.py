"""Kafka plumbing: everything between a Python record and bytes on a topic.

Owns the event schemas at run time and their wire format (``codec``), the dispatcher's
durable hand-off to Kafka (``spool``, ``producer``), the topic layout (``topics``), the
compacted-topic views every process reads policies and keys from (``compacted``) and
waiting out a Kafka outage (``kafka_retry``). It does not decide what an event means:
budgets, metering and the agents do.
"""
