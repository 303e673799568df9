"""python -m weightshare: the command line (weightshare.cli)."""
from weightshare.cli import main

main()
