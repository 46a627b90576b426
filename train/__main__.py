from train.app import main

main()
