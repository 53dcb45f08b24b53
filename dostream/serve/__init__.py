"""`dostream serve`: an OpenAI-compatible endpoint over the agent that records every exchange as a stream.

`app.py` (the endpoints), `protocol.py` (the wire format and its checks), `record.py` (which
recorded sample a request continues; its new segments), `batcher.py` (continuously batched sampling),
`store.py` (the append-only SQLite store), `auth.py` (API keys).
"""
