"""One module per benchmark suite; each defines ``run(quick) -> list[Row]``."""
