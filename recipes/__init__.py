"""Example recipes, personas and backends: the embedded defaults."""
