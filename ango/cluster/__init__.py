"""Several `ango serve` instances sharing the routing slots (issue 13).

Ownership of a routing slot only decides which instance keeps the counters of
the customers hashed to it in memory, so that a customer's claims meet in one
process. It never decides whether a claim is correct: PostgreSQL arbitrates
every claim (leases, rule slots, unique indexes), whoever serves it.
"""
