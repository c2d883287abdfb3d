"""The LLM call between the web layer and the events: validate, admit, call upstream, record.

Owns one chat call's pipeline (``pipeline``: request validation, the budget gate's
admission, upstream choice and retry, streaming pass-through with usage capture) and the
upstream providers (``upstreams``). aiohttp request handling is ``app.http``'s.
"""
