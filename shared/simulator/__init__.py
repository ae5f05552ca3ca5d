"""A local exchange simulator: recorded traffic served on 127.0.0.1 in each exchange's own
protocol (WebSocket subscribe/ping rules, REST snapshots, signed order endpoints), with
injectable faults. Used by the tests and by anyone who wants to run offline."""
