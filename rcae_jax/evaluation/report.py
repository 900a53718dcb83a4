"""results.md: the metrics of each category as a Markdown table."""


def results_table(report: dict) -> str:
  """Markdown table: one row per category (and `mean` when present)."""
  keys = ['image_auroc', 'pixel_auroc', 'au_pro', 'pixel_ap', 'image_f1_max',
          'pixel_f1_max']
  lines = ['| category | ' + ' | '.join(keys) + ' |',
           '|---|' + '---|' * len(keys)]
  for category, m in report.items():
    cells = [f'{m[k]:.4f}' if isinstance(m.get(k), float) else '-'
             for k in keys]
    lines.append(f'| {category} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
