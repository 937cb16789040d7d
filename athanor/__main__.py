from athanor.cli.main import main

main()
