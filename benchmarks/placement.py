"""The placement benchmark (issue 17); the code is pared.workloads.placement (also
`pared bench --placement PART`). Usage: see that module, or --help."""
from pared.workloads.placement import main

if __name__ == "__main__":
    main()
