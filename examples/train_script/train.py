"""A plain training script that hyperfleet can tune without changes to how it is run.

    python train.py --alpha 1e-4 --penalty l2                       # by hand
    hyperfleet run --direction maximize --space space.toml \\
        --cmd "python train.py --alpha {alpha} --penalty {penalty} --l1-ratio={l1_ratio} \\
               --learning-rate {learning_rate} --eta0={eta0}"       # a search

It trains a linear classifier on scikit-learn's bundled digits data one epoch at a time,
reports the validation accuracy after each epoch, and stops early when the pruner says so.
Run by hand, the client calls do nothing and the final accuracy is printed as a JSON line.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from hyperfleet import client


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--penalty", choices=["l2", "l1", "elasticnet"], default="l2")
    parser.add_argument("--l1-ratio", type=float, default=0.15)
    parser.add_argument("--learning-rate", choices=["optimal", "adaptive"], default="optimal")
    parser.add_argument("--eta0", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    features, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        features, labels, test_size=0.25, random_state=args.seed, stratify=labels
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    model = SGDClassifier(
        loss="log_loss",
        alpha=args.alpha,
        penalty=args.penalty,
        l1_ratio=args.l1_ratio,
        learning_rate=args.learning_rate,
        eta0=args.eta0,
        random_state=args.seed,
    )
    classes = np.unique(labels)
    rng = np.random.default_rng(args.seed)
    accuracy = 0.0
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        model.partial_fit(x_train[order], y_train[order], classes=classes)
        accuracy = float(model.score(x_val, y_val))
        print(f"epoch {epoch}: validation accuracy {accuracy:.4f}")
        client.report(accuracy, step=epoch)
        if client.should_prune():
            print("pruned: stopping early")
            sys.exit(0)
    client.result(accuracy)


if __name__ == "__main__":
    main()
