"""One API exchange as it passes: its state (`Exchange`), the stream relay and its reader, the one answer
pipeline that decides what the client gets, and the record built from it. Of mitmproxy only its flow data
types; an exchange is ended early through a callback the addons pass to mitm/.
"""
