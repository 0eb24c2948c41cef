"""Where and how things run: torch.distributed groups, dtype choice by measurement, error lines."""
