from tuning.tiny import main

main()
