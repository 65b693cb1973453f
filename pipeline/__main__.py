from bertpipe.cli import main

main()
