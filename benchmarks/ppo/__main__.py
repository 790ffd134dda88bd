from benchmarks.ppo.run import main

main()
