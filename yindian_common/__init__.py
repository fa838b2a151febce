"""Code every YinDian process shares: clock, field rules, errors, database
engines, gRPC server bootstrap, settings and logging. Nothing here knows a
business rule beyond the wire contract's field rules."""
