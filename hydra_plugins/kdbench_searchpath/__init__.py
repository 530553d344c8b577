"""Hydra discovers this SearchPathPlugin in the `hydra_plugins` namespace package: it appends the config trees of
the packages that register kdbench methods through the `kdbench.methods` entry point (kdbench.plugins), so their
`conf/method/<name>.yaml` files are options of kdbench's groups, in the CLI and in the compose API alike."""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class KDBenchPluginSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from kdbench.plugins import plugin_search_paths

        for path in plugin_search_paths():
            search_path.append(provider=f"kdbench-plugin:{path[len('pkg://'):-len('.conf')]}", path=path)
