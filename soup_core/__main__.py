from soup_core.cli import run

run()
