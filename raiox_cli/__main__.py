from raiox_cli.cli import main

main()
