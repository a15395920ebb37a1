"""Many real nodes under churn, dead mailboxes and partitions (`pigeon sim`)."""
