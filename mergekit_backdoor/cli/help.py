"""Help pages that read like the commands are used: on/off flags without a value placeholder
(Typer prints ``--quick <bool>``, even ``--help <bool>``), and arguments as ``SUSPECT`` rather
than ``{suspect}``. :class:`TidyGroup` applies this to every command of the app."""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup


def _tidy_params(params: list[Any]) -> list[Any]:
    for param in params:
        if isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
        elif getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # no "<bool>" after an on/off flag
    return params


def _usage_pieces(command: Any, ctx: Any) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument):
            name = param.metavar or param.name.upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        else:
            pieces += param.get_usage_pieces(ctx)
    return pieces


class TidyCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _usage_pieces(self, ctx)


class TidyGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            _tidy(command)

    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*_usage_pieces(self, ctx), self.subcommand_metavar or "COMMAND [ARGS]..."]


def _tidy(command: Any) -> None:
    """Re-class Typer's own command objects (same layout, tidier help)."""
    if type(command) is TyperCommand:
        command.__class__ = TidyCommand
    elif type(command) is TyperGroup:
        command.__class__ = TidyGroup
        for sub in command.commands.values():
            _tidy(sub)
