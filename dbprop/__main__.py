"""Command line: ``python -m dbprop demo [options]`` and ``python -m dbprop info``."""
import sys


def main() -> None:
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "demo":
        from .demo import main as demo_main
        demo_main(rest)
    elif command == "info":
        import dbprop
        print(f"dbprop {dbprop.__version__}: {dbprop.backend_info()}")
    else:
        print("usage: python -m dbprop demo [--quick] [--epochs N] [--lambdas L,...] [--jacobian-lambda L]\n"
              "                              [--attacks gradient,bim,cw|none] [--seed S] [--device D] [--out DIR]\n"
              "       python -m dbprop info\n"
              "(python -m dbprop demo --help lists every option)")
        sys.exit(0 if command in ("-h", "--help") else 2)


if __name__ == "__main__":
    main()
