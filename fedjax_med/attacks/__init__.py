"""Privacy attacks and audits: membership inference and empirical epsilon lower bounds."""
