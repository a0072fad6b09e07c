from deepserve.cli import main

main()
