from histocsc.cli import run

run()
