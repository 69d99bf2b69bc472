"""python -m mmgpt.bench [decode options]  |  python -m mmgpt.bench train [training options]  |
python -m mmgpt.bench integrity [--artifacts DIR]  |  python -m mmgpt.bench serving [serving options]  |
python -m mmgpt.bench http [--artifacts DIR]"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        from mmgpt.bench.train import main as train_main
        return train_main(argv[1:])
    if argv and argv[0] == "serving":
        from mmgpt.bench.serving import main as serving_main
        return serving_main(argv[1:])
    if argv and argv[0] == "http":
        from mmgpt.bench.http_overhead import main as http_main
        return http_main(argv[1:])
    if argv and argv[0] == "integrity":
        from mmgpt.bench.integrity import main as integrity_main
        return integrity_main(argv[1:])
    if argv and argv[0] == "decode":
        argv = argv[1:]
    from mmgpt.bench.decode import main as decode_main
    return decode_main(argv)


if __name__ == "__main__":
    main()
