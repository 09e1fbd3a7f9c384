Faster under load: TCP_NODELAY on SMTP connections both ways (delivery no
longer waits on delayed ACKs), the queue directory's fsync shared by
concurrent commits and removals (group commit), O(1) rate-limit counters, and
a verified password remembered for five minutes (as a keyed HMAC, never the
password) so that a client logging in for every few messages costs one slow
hash per five minutes.
The spool keeps the emptied files of delivered messages in ``free/`` and
writes new messages into them, instead of creating and deleting two files per
message.
Delivery uses PIPELINING when the next hop offers it (MAIL, RCPT and DATA in
one write, the message and its final dot in one write) and sends RSET only
after a transaction that did not end normally. TLS session tickets are on:
clients that reconnect can resume their session.
New ``[queue] flow_delay`` (default 1 second): when deliveries fall behind
arrivals, new transactions wait at ``MAIL FROM`` for at most that long, so the
queue does not grow without bound under sustained load.
New ``[server] workers`` (default ``"auto"``: one per CPU core): SMTP
sessions are taken by that many processes sharing the listening sockets. The
main process alone delivers, and keeps the lockout, the rate limits, the
connection limits, in-flow control and the metrics for all of them; a worker
that dies is started again, and SIGHUP reloads every process. Set
``workers = 1`` for a single process.
The made-up SCRAM salt of an unknown user now comes from a key kept in the
queue directory (``scram-salt.key``), so it is the same in every process
and after a restart, and does not tell that the user does not exist.
In-flow control now lets sessions wait at ``MAIL FROM`` only once 16 times
``max_concurrent_deliveries`` new messages wait for delivery (was twice):
with worker processes the small backlog kept the deliveries short of work.
Less CPU per message (3 to 10 % in the benchmark): the spool's disk work
runs on threads of its own without Twisted's thread-pool bookkeeping, and
text log lines are formatted without ``string.Formatter`` where the result
is the same.
The objects built at startup are frozen out of the garbage collector's way
(``gc.freeze``), so full collections no longer pause every session to walk
them.
