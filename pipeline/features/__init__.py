"""What features do: streaming statistics, decoder geometry (logit effects, neighbours), text probes."""
