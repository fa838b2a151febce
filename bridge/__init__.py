"""bridge: the bank's front end. Serves BillingService to the bank's core,
journals money-moving requests, forwards them to the utility and resolves
in-doubt payments (store-and-forward)."""
