"""Art search: embedding indexes over image archives (`index`), queries (`similar`, `recommend`), memorisation audit."""
