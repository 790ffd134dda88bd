from benchmarks.kernels.run import main

main()
