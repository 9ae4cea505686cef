from ftwt_cli.cli import main

main()
