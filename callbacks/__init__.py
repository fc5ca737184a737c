"""Lightning callbacks for continual skill composition, installed as ``skillbank.callbacks``.

* :class:`SkillHarvester`: at the end of a finetuning run, localize its skill and add it to a bank.
* :class:`SkillStitcher`: while a Trainer runs, stitch each new skill of a bank into the model.
* :class:`SkillSwitcher`: answer each batch of a validate, test or predict run with the skill it names.
"""

from skillbank.callbacks.skill_harvester import SkillHarvester
from skillbank.callbacks.skill_stitcher import SkillStitcher
from skillbank.callbacks.skill_switcher import SkillSwitcher

__all__ = ["SkillHarvester", "SkillStitcher", "SkillSwitcher"]
